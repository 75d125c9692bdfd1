"""l2c.trainer.text: caption-contrastive fine-tuning of the text LLM (bidirectional, mean pooling, LoRA, MNTP)."""
