"""Coordinator-side code: stage layouts, merging edge sets, routes, jobs."""
