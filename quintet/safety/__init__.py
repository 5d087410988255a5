"""Red-teaming by harm category (Aurora-M): prompt sets, judges, evaluation and reports."""
