"""raycyto.models"""
