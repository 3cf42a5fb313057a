"""RL post-training for Z-Image: rewards, Diffusion-DPO (offline) and Flow-GRPO (online).

``python -m train.run CONFIG`` runs it when the configuration has an ``[rl]`` section (``method = "dpo"`` or
``"grpo"``). The pieces are importable on their own: :mod:`train.rl.rewards` (one reward interface, built-in
rewards and ``module:function`` plug-ins), :mod:`train.rl.ocr` (the text-rendering reward), :mod:`train.rl.dpo`
(loss, pairs and curriculum), :mod:`train.rl.grpo` (advantages and the clipped objective), :mod:`train.rl.rollout`
(candidates and SDE rollouts through the engine's pipeline) and :mod:`train.rl.trainer`.
"""
