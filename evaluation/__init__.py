"""Generation and evaluation: predictions from a trained FlyThinker, LongLaMP metrics, reports, analysis."""
