"""What a model gives back of its training code: prompts, clone audits,
k-extractability, extraction ranking."""
