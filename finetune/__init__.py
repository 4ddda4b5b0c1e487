"""Fine-tuning: adapters and heads for downstream tasks, evaluation, export."""
