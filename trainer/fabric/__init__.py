"""Fabricated models: seeded random weights of a flavour's real shapes, in the layouts users have.

    python -m trainer fabricate klein-base-4b --layout hub   --out /work/fab/klein4b-hub
    python -m trainer fabricate flux1-dev     --layout comfy --out /work/fab/flux1-comfy

Layouts:
  hub    the diffusers repo as the loader reads it: model_index.json, each component's config.json naming its
         real class, sharded safetensors with their index (5 GB shards, as the hub's), the scheduler and small
         tokenizers (ids far below the real vocabulary);
  comfy  ComfyUI's single files with BFL / ComfyUI key names under models/ (diffusion_models, text_encoders, vae),
         and source/: the same hub folder without weights, for model.source (configs, tokenizers, scheduler).

The API is trainer/fabric/make.py (fabricate, existing, needed_bytes, real_width).
Weights are written tensor by tensor (trainer/fabric/stream.py), never a whole model in memory. The folder is
built as `.<name>.partial` beside the target and renamed at the end, with fabricated.json (what, how big, how long)
written last, so a killed fabricate leaves nothing a later run would take for a model.
"""
