"""The gateway: gRPC `Inference` for devices — auth, policy and budget enforcement, Gemini Flash upstream."""
