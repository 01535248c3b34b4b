"""raycyto.synth"""
