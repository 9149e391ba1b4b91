"""The generator family: VAE, diffusion transformer, condition encoder, prompt enhancer, rewards."""
