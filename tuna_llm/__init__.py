"""Everything that touches a model, Django-free.

Catalog and loading of base models, the device plan, chat templates and tokenization, the LoRA training
workflow, the evaluation workflow and its metrics, the generation engine with request batching.
Nothing here imports Django: the site hands its settings in through ``tuna_llm.settings.configure``.
torch, transformers and peft are imported inside functions, so importing a module stays cheap.
"""
