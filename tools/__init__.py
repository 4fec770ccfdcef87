"""Scripts and plumbing that are not a paper stage; the stage files import what they need from here."""
