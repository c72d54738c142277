"""The graph vocabulary every stage shares, and that imports none of them.

* ``ops``:    op identity (an ATen ``OpOverloadPacket``, namespace checked) and names;
* ``shapes``: static sizes of a node's value (None where symbolic: the batch);
* ``plan``:   ``Plan`` (what a rule decides for one node), ``PlanKind``, the demand types;
* ``rule``:   ``Rule`` (one registered object per op family) and ``RuleTable`` (the registry);
* ``labels``: ``ComponentLabel``, the static description of one component.

Layers (checked by ``tests/test_layers.py``): ``graph`` and ``errors`` at the bottom;
``capture`` and ``analyse`` import only them; ``rewrite`` adds ``analyse``; ``run`` adds
``capture`` and ``rewrite``; applications (``interpret``, the CLI) sit on top. ``analyse`` calls
the rules through the ``RuleTable`` it is handed (``rewrite.rules.RULES``), never by import.
"""
