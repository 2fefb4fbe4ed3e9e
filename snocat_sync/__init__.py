"""snocat for blocking programs: stdlib sockets and one pump thread."""
