"""Security: CurveZMQ key files (``keys``), the key ring, the ZAP handler and the bind checks
(``auth``).
"""
