"""The database kind of Data Delivery: rows into owners' own PostgreSQL and MySQL/MariaDB tables."""
