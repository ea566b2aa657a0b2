"""raygen.data"""
