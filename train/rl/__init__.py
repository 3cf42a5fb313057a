"""RL post-training for Z-Image: rewards, Diffusion-DPO (offline), Flow-GRPO (online) and DMDR (distillation with
a reward).

``python -m train.run CONFIG`` runs it when the configuration has an ``[rl]`` section (``method = "dpo"`` or
``"grpo"``; ``"dmdr"`` runs :class:`train.rl.dmdr.DMDRTrainer`, a distiller). The pieces are importable on their
own: :mod:`train.rl.rewards` (one reward interface, built-in rewards and ``module:function`` plug-ins), :mod:`train.rl.ocr` (the text-rendering reward), :mod:`train.rl.dpo`
(loss, pairs and curriculum), :mod:`train.rl.grpo` (advantages and the clipped objective), :mod:`train.rl.rollout`
(candidates and SDE rollouts through the engine's pipeline), :mod:`train.rl.trainer` and :mod:`train.rl.dmdr`.
"""
