"""The NaFlexViT trainer: configuration and CLI, the training loop, evaluation, checkpoints, optimizer and
schedule, logging and torchrun set-up. Built on the model library (naflex.model) and the data library
(loaders, augment); train.py and validate.py are thin CLIs over it.

- ``config``: the typed ``Config`` (one dataclass per concern, each default declared once, ``validate()``);
  ``cli``: timm's flags mapped onto it.
- ``engine``: ``Trainer`` (the step), ``train_one_epoch``, ``fit``; ``metrics``: device-side sums;
  ``callbacks``: the one hook list (tests, SIGTERM).
- ``build``: datasets, model, loaders and run folder from a ``Config``.
- ``evaluate``, ``checkpoint``, ``optim``, ``schedule``, ``logger``, ``distributed``, ``bad_files``.
"""
