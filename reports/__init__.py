"""Rendering results for people: terminal tables now; the HTML report and history later."""
