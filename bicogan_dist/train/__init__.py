"""Training: config, engines (Accelerate DDP, DeepSpeed), the loop, checkpoints, monitoring."""
