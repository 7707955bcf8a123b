"""SSH server and client on top of asyncssh."""
