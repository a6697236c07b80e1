"""Meterline's HTTP edge: parse, authenticate, call billing, relay, render."""
