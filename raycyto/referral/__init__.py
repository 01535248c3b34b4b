"""raycyto.referral: which cases go to a human, with what guarantee; imported by the report and by Serve.

- :mod:`~raycyto.referral.conformal`: split-conformal prediction sets (LAC, APS; Mondrian);
- :mod:`~raycyto.referral.risk`: the risk-controlled (learn-then-test) recall threshold;
- :mod:`~raycyto.referral.temperature`: temperature scaling with ECE before / after;
- :mod:`~raycyto.referral.ood`: the out-of-distribution guard on backbone features;
- :mod:`~raycyto.referral.fit`: every guarantee of a sweep, calibrated on rows that chose nothing;
- :mod:`~raycyto.referral.policy`: the rule a served bundle applies to one image.
"""
