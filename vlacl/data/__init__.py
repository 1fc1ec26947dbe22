"""Datasets: LeRobot and HDF5 readers behind one lazy episode interface, and what is built on them.

Task streams, windows and chunks, exact statistics and normalization.
"""
