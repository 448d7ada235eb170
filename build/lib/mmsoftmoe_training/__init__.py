"""mmsoftmoe's trainer: contrastive pretraining of CLIP models with Soft MoE image towers, via accelerate."""
