"""raygen.metrics"""
