"""Speech encoders, the adapter and the SLM composition."""
