"""raycyto.tune"""
