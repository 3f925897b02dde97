"""The engine: one sharpness-aware step and what it is made of, without Lightning.

Arms (``arms``, ``arm_groups``), samplers (``samplers``), the ascent (``perturbation``), the trainable set
(``trainable``), the step itself (``step``), what an adapter holds between steps (``run``), the interface every
method implements (``method``, ``method_options``), and the step's services (``argument_checks``, ``step_options``,
``prefix_reuse``, ``attention_inputs``, ``distributed``, ``skipped_steps``). Nothing here imports Lightning,
:mod:`lightning_slsam.methods`, the adapters or the app (``tests/test_package_layout.py`` reads the imports).
"""
