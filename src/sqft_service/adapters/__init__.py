"""LoRA adapters with SQFT's extras (arXiv 2410.03750) on stock transformers + peft.

Submodules (imported explicitly; this package imports nothing heavy on its own):

* :mod:`.lora` — ``build_peft_model``, target-module defaults and checks;
* :mod:`.nls` — Neural Low-rank Adapter Search: elastic-rank controller, ``elastic_adapter_config.json``,
  sub-adapter selection and extraction as a standard PEFT adapter;
* :mod:`.sparse` — SparsePEFT (masked adapter deltas) and ``sparsity_report``;
* :mod:`.merge` — ``merge_adapter`` (dense or sparsity-preserving);
* :mod:`.sparsify` — magnitude / Wanda pruning of a base model.
* :mod:`.peft_utils` — helpers the methods share: ``base_of``, ``lora_layers``, PEFT module-name
  matching, decoder layer indices, rank checks.
"""
