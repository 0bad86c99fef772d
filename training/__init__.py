"""Fine-tuning an InstructPix2Pix UNet (Brooks et al. 2022, sec. 3.2). Work in progress: the model
initialisation, conditioning dropout and paired data loading are here; the accelerate training loop
is tracked in its issue."""
