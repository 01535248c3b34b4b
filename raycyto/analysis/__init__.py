"""raycyto.analysis"""
