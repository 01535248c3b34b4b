"""raycyto.data"""
