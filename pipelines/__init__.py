"""Denoiser adapters over diffusers pipelines, and the bundled shapes model.

Installed as ``diffsearch.pipelines``. ``load_denoiser`` picks the adapter from the pipeline's
``model_index.json``.
"""
