"""raygen.train"""
