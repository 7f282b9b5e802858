"""Byte movers behind one small interface (``send_parts``, ``recv_into_exact``, ``close``).

``tcp``: several connections per peer, tuned sockets, TCP_INFO statistics, optional TLS.
"""

from kvwire.transport.tcp import SocketOptions, TcpListener, TcpStream, connect, parse_address

__all__ = ["SocketOptions", "TcpListener", "TcpStream", "connect", "parse_address"]
