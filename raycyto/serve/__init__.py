"""raycyto.serve"""
