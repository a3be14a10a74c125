"""Fine-tuning: data rendered through chat templates with the loss on the answers, full / LoRA / adapter methods,
built-in tasks, and catastrophic forgetting measured before and after."""
