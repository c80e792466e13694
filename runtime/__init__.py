"""kvscope runtime: models, engine, scheduler, KV tiers, integrity. Never imports Textual."""
