"""compiles"""
