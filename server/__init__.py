"""hotlora's serving side: one NF4 base model, a different LoRA adapter per request."""
