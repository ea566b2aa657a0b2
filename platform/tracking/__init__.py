"""raygen.tracking"""
