"""Names the command line offers (methods), importable without torch: ``adafuse --help`` and a mistyped argument
answer before torch, transformers and Lightning load."""

STRATEGY_METHODS = ("ewc", "lwf", "replay")  # continual-learning strategies over a shared, trained model
METHODS = ("adapters", "shared-adapter", "full-finetune", *STRATEGY_METHODS)
