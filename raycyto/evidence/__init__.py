"""raycyto.evidence: where an answer comes from -- evidence maps (:mod:`.maps`), chromosome
layouts of ordered karyograms (:mod:`.layout`) and the measurements against the synthetic
truth (:mod:`.evaluation`: pointing accuracy, white-cell hits, the deletion test)."""
