"""texlive"""
