"""diffusers VAEs as tokenizers (registry name ``diffusers-vae``); being written."""
