"""Models that pygeo can train and analyse."""
from .complex_vae import ComplexVAE, train_complex_vae
