"""Training: PPO backbones on combined rewards (:mod:`bonesoup.train.ppo`), the rewards, the
explicit value models and the ``bonesoup train`` / ``train-all`` commands."""
