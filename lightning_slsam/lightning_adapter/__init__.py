"""The Lightning adapter: the callbacks (``callback``), the mixin that owns ``training_step`` (``mixin``) and
what they need from Lightning (``pass_context``, ``module_conversion``, ``fisher_samples``, ``lr_schedules``,
``probability_logging``, ``rng_state``). It imports the engine and the methods; they never import it.
"""
