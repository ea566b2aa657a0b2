"""raygen.tune"""
